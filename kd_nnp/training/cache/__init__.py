"""The on-disk caches of training: CHGNet graphs (:mod:`.graphs`), frozen-backbone features
and their Jacobians (:mod:`.features`), and the loader that serves them to the data module
(:mod:`.attach`)."""
