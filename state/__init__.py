"""Durable state of ckptd: job specs, the SQLite job store, run directories, atomic file writes.

Daemon side: never imports TensorFlow.
"""
