"""Model surgery: which layers get adapters, their kohya names, their blocks, and the network object."""
