"""Default size of ``cxr-search demo`` (no imports: the CLI reads them without loading the demo's dependencies)."""

#: Studies in the synthetic archive (about 1.75 images each); sized for the 10-minute budget on 2 CPU cores.
DEFAULT_STUDIES = 1200
#: Training epochs of ``tiny-synth`` on the training patients.
DEFAULT_EPOCHS = 30
#: Hits per example query.
DEFAULT_K = 8
