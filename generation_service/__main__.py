from generation_service.server import main

main()
