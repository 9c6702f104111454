"""The Lightning namespace the suite runs under: ``$LIGHTNING_CLIP_NAMESPACE`` (``lightning.pytorch`` or
``pytorch_lightning``), else ``lightning.pytorch`` when installed. CI runs the Lightning-facing tests under both."""

from lightning_clip._lightning import preferred

NS = preferred()
#: ``lightning.pytorch`` or ``pytorch_lightning``
pl = NS.module
NAME = NS.name
