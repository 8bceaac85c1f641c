"""The data side of the training process: the batching, shuffling and validation split ckptd
owns, `ckptd.fit`'s data under Keras's rules, and tf.data pipeline state carried in checkpoints."""
