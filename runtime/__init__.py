"""Runtime: video decoding and preprocessing, vision backends, LLM backends, the pipeline and its validation."""
