"""Base-model construction: architecture configs for SD1.x / SD2.x / SDXL and tiny test-size versions."""
