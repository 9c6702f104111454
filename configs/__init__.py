"""The built-in LightningCLI configs (``lightning-clip configs`` lists them)."""
