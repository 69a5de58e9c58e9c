"""The processor stage: JobRequested in, DataProcessed (or JobFailed) out."""
