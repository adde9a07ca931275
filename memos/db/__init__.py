"""Storage: SQLAlchemy models, engine set-up and migrations. The database is the source of truth."""
