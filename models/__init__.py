"""Pure numeric code: Cleora embeddings, EMDE codebooks and sketches, the user-state aggregator,
the MLP and versioned artifacts. No Kafka, no asyncio, no global state."""
