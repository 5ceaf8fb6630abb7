from teacher_service.cli import main

main()
