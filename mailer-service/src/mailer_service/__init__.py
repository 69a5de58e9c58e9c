"""The mailer stage: DataProcessed in, an email out, EmailSent (or JobFailed) published."""
