"""jaxconv's native code: ``onednn_conv.cc`` (compiled by the package build) and :mod:`locate` (where oneDNN is)."""
