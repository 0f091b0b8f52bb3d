"""Adapters for training frameworks, installed as ``recoverkit.integrations``."""
