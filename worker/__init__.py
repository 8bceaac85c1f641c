"""Code that runs inside the training process (imports TensorFlow). The daemon side never imports it."""
