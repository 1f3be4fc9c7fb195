"""nn.Modules that own parameters and cache I/O: attention, conba, mlp, moe, norm."""
