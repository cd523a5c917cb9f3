"""One APIRouter per concern: health and metrics, search, studies and images, the web pages."""
