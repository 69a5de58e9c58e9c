"""The api stage: jobs in over REST, JobRequested out."""
