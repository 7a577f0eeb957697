"""PyTorch Lightning wrappers of the learned editors: ``MENDModule``, ``SERACModule``, ``EditDataModule``.

Import the submodules directly (``kedit.lightning.mend``, ``kedit.lightning.data``); this
package imports nothing heavy itself.
"""
