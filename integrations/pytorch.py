"""The resumable DataLoader adapter for plain PyTorch loops (``recoverkit.integrations.pytorch``).

It lives in :mod:`recoverkit.state.loader`, below ``protect()`` that uses it; this module is
the name users import it by.
"""

from recoverkit.state.loader import LoaderPosition, ResumableLoader, resumable_loader

__all__ = ["resumable_loader", "ResumableLoader", "LoaderPosition"]
