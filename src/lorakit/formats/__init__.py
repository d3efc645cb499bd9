"""File formats: validated safetensors I/O and pure key/tensor converters for kohya/LyCORIS files."""
