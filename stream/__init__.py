"""The Kafka shell on faust-streaming + aiokafka: settings, record schemas and validation, the
worker (a batch consumer), tables, the model-version subscriber and the refresh job. It moves
bytes in and out and calls ``sketchstream.models`` for every computation."""
