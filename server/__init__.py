"""The central server: teacher training, teacher score table, Flower ServerApp."""
