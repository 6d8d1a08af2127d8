"""The wire: message schemas (schema), the envelope codec (codec) and links (link)."""
