"""Building requests: templates over columns, images, structured-output shaping and JSON Schema."""
