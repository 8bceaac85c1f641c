"""The training loops: ckptd's fit loop, custom loops' sessions, epoch ends (callbacks,
validation, history, best file, early stopping) and the exactness checks."""
