"""Signed URLs: the signer lives in ``common.signing`` (the webhook sender signs output URLs too)."""

from lipfarm.common.signing import Signer, live_folder, output_path

__all__ = ["Signer", "live_folder", "output_path"]
