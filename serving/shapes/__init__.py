"""The synthetic shapes world the `tiny` model is trained and judged on."""
