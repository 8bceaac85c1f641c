"""The checkpoint side of the training process: restore, saves (sync, or async through a
snapshot and the writer), the commit protocol on top of tf.train.CheckpointManager, what a
checkpoint tracks, and the memory tier's snapshots."""
