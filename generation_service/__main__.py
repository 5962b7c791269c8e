from generation_service.server import main

# Guarded: worker processes (spawned) import this module again.
if __name__ == "__main__":
    main()
