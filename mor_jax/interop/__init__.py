"""Moving weights between mor-jax and other formats (PyTorch reference, Hugging Face).

  reference.py        reference state-dict keys <-> our param tree (shared tensors checked equal)
  layout.py           stacked vs scan/unrolled block layouts
  hf.py               Hugging Face directories: config.json, safetensors / pytorch_model.bin, tokenizer files
  importer.py         --mode=import: reference / HF directory -> Orbax workdir (+ probe logits)
  gguf.py             --mode=import of a llama.cpp .gguf file (Llama): dequantised weights, tokenizer, chat template
  exporter.py         --mode=export_hf: workdir -> LlamaForCausalLM directory (MoR: reference layout + routing config)
  pretrained_init.py  config.init: start a recursive / MoR model from a pretrained vanilla one (spec section 7), or
                      any model from one of its architecture (fine-tuning); unset config fields from the source

torch and transformers are never imported here at module level (only to read a pytorch_model.bin).
"""
