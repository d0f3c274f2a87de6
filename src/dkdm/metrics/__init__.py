"""Sample-quality metrics. Each metric module imports only what it needs, lazily."""
