from services.decode_gateway.service import main

main()
