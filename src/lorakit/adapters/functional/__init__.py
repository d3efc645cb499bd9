"""Pure tensor math for every algorithm: no nn.Module, no config objects, no I/O."""
