"""ckptd: fault-tolerant training for TensorFlow/Keras.

The code lives in the repository's top-level folders (the design card's layout); this package
reaches them through relative symlinks, so `ckptd.daemon`, `ckptd.supervisor`, `ckptd.state` and
`ckptd.worker` import the same way from a plain checkout (mypy, pyright, IDEs, `python -m
ckptd`) as from an installed wheel, and no bare top-level name (`daemon` is PyPI's
python-daemon) is ever installed.
"""
