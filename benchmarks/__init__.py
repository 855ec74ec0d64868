"""The figures the README quotes, as code a user can rerun: ``lipfarm bench``."""
