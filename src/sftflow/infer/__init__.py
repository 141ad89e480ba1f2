"""Use a tuned model: the chat engine, `sftflow chat`, the OpenAI-compatible `sftflow api`, `sftflow predict`."""
