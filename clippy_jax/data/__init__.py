"""Data: sources, preprocessing, the tokenizer, the synthetic demo set and dataset builders."""
