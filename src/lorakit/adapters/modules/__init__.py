"""nn.Module wrappers that own adapter parameters and call the functional math."""
