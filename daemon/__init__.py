"""The ckptd command line and (later) service. Daemon side: never imports TensorFlow."""
