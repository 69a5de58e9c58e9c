from processor_service.main import main

main()
