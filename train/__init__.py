"""Everything that changes weights: training data, the CXR-CLIP losses and trainer, and the linear probe.

``train`` uses the core (``cxr_search``) and never imports ``index``. Recipes are JSON files in
``train/recipes/`` (the six reference recipes and ``tiny-synth``).

Modules:

* ``config``: training recipes as frozen dataclasses.
* ``inputs``: manifest rows checked against the recipe, report texts, paraphrases, worker setup.
* ``dataset``: :class:`~train.dataset.StudyDataset`: two images and two texts per study, and the collate.
* ``augment``: the reference training augmentation (no flips).
* ``prompt_reports``: short reports written from the labels of label-only datasets.
* ``sampling``: resumable, rank-aware batch order and per-sample seeding.
* ``losses``: the CXR-CLIP losses (CLIP, ICL, TCL, optional label term).
* ``optim``: AdamW and the per-step warm-up + cosine schedule.
* ``distributed``: ``torchrun`` process groups and gradient-carrying collectives.
* ``warm_start``: where a run's weights start (scratch, pretrained towers, released file, checkpoint).
* ``validate``: validation loss and Recall@K during training.
* ``state``: resumable training checkpoints and the run folder layout.
* ``metrics_log``: metrics as JSON lines (and TensorBoard when installed).
* ``trainer``: :func:`~train.trainer.train`, for one process or many.
* ``probe``, ``probe_labels``: the linear probe and its label targets.
* ``commands``: the ``train`` CLI sub-app.
"""
