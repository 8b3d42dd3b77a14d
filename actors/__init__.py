"""Ray actors: target backends and the streaming client used by train workers."""
