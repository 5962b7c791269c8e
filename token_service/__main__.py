from token_service.server import main

main()
