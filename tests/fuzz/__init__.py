"""Structure-aware fuzzing of every input edgekit parses (``make fuzz``; a quick slice runs in ``make test``).

Each case mutates a good seed (a GGUF file, an ONNX artifact, a manifest, a recipe, a device profile, a
Hugging Face directory's config.json / tokenizer.json / safetensors, a chat template), runs the entry point a
user would (``edgekit.load`` + generate, ``edgekit convert``, ``edgekit profile``, ``edgekit targets``) in a
forked child with a timeout, and classifies the outcome: good (success, or one ``error:`` line), traceback,
signal (a native crash), hang, half-written output, or escaped (a template reached outside its sandbox).
Cases are seeded: ``python -m tests.fuzz --seed S --only KIND:INDEX`` replays one.
"""
