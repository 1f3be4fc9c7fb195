"""Pure tensor functions: no nn.Module, no config (imports flow models → layers → ops)."""
