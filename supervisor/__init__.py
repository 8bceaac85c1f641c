"""Supervision of training workers: pure policy (classify, restart) and the loops that apply it.

Daemon side: never imports TensorFlow.
"""
