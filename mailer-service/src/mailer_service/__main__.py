from mailer_service.main import main

main()
