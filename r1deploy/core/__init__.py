"""The shared nouns the layers, models, engine and distributed packages all use, low in the import order: the
step's batch schema (ForwardBatch) and DeepSeek's config (which reads its AWQ quantization_config through
quant/awq.AWQConfig)."""
