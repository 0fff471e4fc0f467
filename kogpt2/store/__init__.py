"""Models on disk: the ``.tar`` checkpoint, pretrained releases, scratch models, and the one way to open a model."""
