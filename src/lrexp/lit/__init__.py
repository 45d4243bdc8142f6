"""The Lightning shell: LightningModule, TBPTT callback, MLflow logger, performance callback."""
