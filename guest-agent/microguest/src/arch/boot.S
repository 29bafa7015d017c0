/*
 * The microguest's ring-0 code: everything that must run at CPL0, kept to a few hundred
 * instructions because ring-0 code is emulated instruction by instruction on the PVM host.
 * No SSE here. Ring-3 Rust (native speed) does all the real work.
 *
 * Entry points:
 *   pvh_entry   32-bit protected mode, paging off, EBX = hvm_start_info (PVH boot protocol)
 *   _start      64-bit long mode with the loader's page tables, RSI = Linux boot_params
 *   ap_trampoline_start..end   real-mode code the BSP copies below 1 MiB for INIT/SIPI
 *
 * After switching to our own GDT, IDT, TSS and page tables, each CPU `iretq`s into ring 3:
 * the BSP into microguest_main(boot_info, protocol), application processors into ap_main(index).
 * Ring 3 calls ring 0 by executing HLT with a service number in RDI: the #GP it raises lands
 * in ring 0, which sees the HLT and serves the request (0 = halt this CPU, 1 = CPUID with
 * EAX/ECX in, EAX-EDX out, 2 = wait for an interrupt: STI; HLT; CLI, so an idle CPU sleeps
 * until a device, a doorbell or its LAPIC timer wakes it). Ring 3 runs with interrupts off;
 * one that arrives meanwhile stays pending and ends the next wait at once. Vectors 0x30-0x3f
 * only acknowledge the LAPIC (EOI): ring 3 looks at its devices itself after a wait. On the PVM host INT n from ring 3 raises #UD and SYSCALL does not
 * reach CPL0, while exceptions are delivered faithfully; and only ring-0 CPUID (emulated by
 * KVM) sees the VMM's CPUID table, ring-3 CPUID runs natively on the host.
 */

    .set MAX_CPUS, 64
    .set KSTACK_SIZE, 4096
    .set BSP_USTACK_SIZE, 0x40000
    .set AP_USTACK_SIZE, 0x4000
    .set TSS_STRIDE, 128
    .set IOPB_SIZE, 8192

    .set SEL_KCODE, 0x08
    .set SEL_KDATA, 0x10
    .set SEL_UDATA, 0x23        /* GDT entry 4, RPL 3 */
    .set SEL_UCODE, 0x2b        /* GDT entry 5, RPL 3 */
    .set SEL_TSS0, 0x30         /* GDT entries 6.. hold one 16-byte TSS descriptor per CPU */
    .set GDT_LIMIT, 0x30 + MAX_CPUS * 16 - 1

    .set PROTO_LINUX64, 1
    .set PROTO_PVH, 2

    .set SERIAL_PORT, 0x3f8
    .set DEBUG_EXIT_PORT, 0xf4
    .set STATUS_CRASH, 3

    .set CR0_PE, 0x1
    .set CR0_MP, 0x2
    .set CR0_EM, 0x4
    .set CR0_NE, 0x20
    .set CR0_WP, 0x10000
    .set CR0_PG, 0x80000000
    .set CR4_BITS, 0x620        /* PAE | OSFXSR | OSXMMEXCPT: ring 3 may use SSE */
    .set MSR_EFER, 0xc0000080
    .set EFER_LME, 0x100
    .set VEC_GP, 13
    .set OPCODE_HLT, 0xf4
    .set SERVICE_HALT, 0
    .set SERVICE_CPUID, 1
    .set SERVICE_WAIT, 2
    .set IRQ_VECTOR_FIRST, 0x30
    .set IRQ_VECTORS, 16
    .set LAPIC_EOI, 0xfee000b0

/* ---------------------------------------------------------------------------------------- */
/* PVH ELF note: XEN_ELFNOTE_PHYS32_ENTRY, read by our VMM (linux-loader) and by QEMU.      */
    .section .note.pvh, "a", @note
    .balign 4
    .long 4                     /* namesz: "Xen\0" */
    .long 8                     /* descsz */
    .long 18                    /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .quad pvh_entry
    .balign 4

/* ---------------------------------------------------------------------------------------- */
    .section .text.boot, "ax"

    .code32
    .globl pvh_entry
pvh_entry:
    cli
    cld
    mov %ebx, %esi              /* hvm_start_info */
    mov $PROTO_PVH, %edi
    lgdt gdt_ptr
    mov $CR4_BITS, %eax
    mov %eax, %cr4
    mov $pml4, %eax
    mov %eax, %cr3
    mov $MSR_EFER, %ecx
    rdmsr
    or $EFER_LME, %eax
    wrmsr
    mov $(CR0_PG | CR0_WP | CR0_NE | CR0_MP | CR0_PE), %eax
    mov %eax, %cr0
    ljmp $SEL_KCODE, $long_entry

    .code64
    .globl _start
_start:
    cli
    cld
    mov $PROTO_LINUX64, %edi    /* RSI already holds boot_params */
    lgdt gdt_ptr(%rip)
    lea pml4(%rip), %rax
    mov %rax, %cr3
    mov %cr4, %rax
    or $CR4_BITS, %rax
    mov %rax, %cr4
    mov %cr0, %rax
    and $~CR0_EM, %rax
    or $(CR0_WP | CR0_NE | CR0_MP), %rax
    mov %rax, %cr0
    pushq $SEL_KCODE
    lea long_entry(%rip), %rax
    push %rax
    lretq

long_entry:
    mov $SEL_KDATA, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %eax, %eax
    mov %ax, %fs
    mov %ax, %gs
    mov %esi, %r12d             /* boot info pointer (32-bit in both protocols) */
    mov %edi, %r13d             /* boot protocol */
    lea kstacks + KSTACK_SIZE(%rip), %rsp
    call build_idt
    lidt idt_ptr(%rip)
    xor %ebx, %ebx              /* CPU index 0 */
    jmp enter_ring3

/* Application processors arrive here from the trampoline, in 64-bit mode on our GDT. */
ap_long_entry:
    mov $SEL_KDATA, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %eax, %eax
    mov %ax, %fs
    mov %ax, %gs
    lidt idt_ptr(%rip)
    mov $1, %ebx
    lock xadd %ebx, next_cpu_index(%rip)
    cmp $MAX_CPUS, %ebx
    jae halt_forever
    /* fall through */

/* rbx = CPU index. Sets up this CPU's kernel stack and TSS, then iretq to ring 3. */
enter_ring3:
    mov %rbx, %rax
    shl $12, %rax               /* KSTACK_SIZE */
    lea kstacks + KSTACK_SIZE(%rip), %rsp
    add %rax, %rsp

    /* TSS i at tss_array + i * 128; all share one I/O permission bitmap that allows every port */
    lea tss_array(%rip), %rdi
    mov %rbx, %rax
    shl $7, %rax
    add %rax, %rdi
    mov %rsp, 4(%rdi)           /* RSP0: where exceptions from ring 3 land */
    lea iopb(%rip), %rax
    sub %rdi, %rax
    mov %ax, 0x66(%rdi)         /* I/O map base, relative to this TSS */
    lea IOPB_SIZE(%rax), %rcx   /* limit covers the bitmap and its 0xff terminator byte */

    /* 16-byte available-TSS descriptor at gdt + 0x30 + i * 16 */
    lea gdt + SEL_TSS0(%rip), %rsi
    mov %rbx, %rax
    shl $4, %rax
    add %rax, %rsi
    mov %rcx, %rax
    and $0xffff, %eax
    mov %rdi, %rdx
    and $0xffffff, %edx
    shl $16, %rdx
    or %rdx, %rax
    movabs $0x0000890000000000, %rdx
    or %rdx, %rax
    mov %rdi, %rdx
    shr $24, %rdx
    and $0xff, %edx
    shl $56, %rdx
    or %rdx, %rax
    mov %rax, (%rsi)
    mov %rdi, %rdx
    shr $32, %rdx
    mov %rdx, 8(%rsi)
    mov %rbx, %rax
    shl $4, %eax
    add $SEL_TSS0, %eax
    ltr %ax

    /* iretq frame for ring 3: SS, RSP, RFLAGS (IF=0, IOPL=0), CS, RIP */
    test %rbx, %rbx
    jnz 1f
    lea bsp_ustack + BSP_USTACK_SIZE - 8(%rip), %rcx
    lea microguest_main(%rip), %rdx
    mov %r12, %rdi
    mov %r13, %rsi
    jmp 2f
1:  mov %rbx, %rcx
    imul $AP_USTACK_SIZE, %rcx
    lea ap_ustacks - 8(%rip), %rax
    add %rax, %rcx              /* AP i uses slot i-1: its top is ap_ustacks + i * size */
    lea ap_main(%rip), %rdx
    mov %rbx, %rdi
2:  pushq $SEL_UDATA
    push %rcx
    pushq $0x2
    pushq $SEL_UCODE
    push %rdx
    iretq

/* Fills the IDT: gates 0-31 go to the exception stubs. Other vectors are not present:
 * delivering one raises #NP, which is reported like any other exception. */
build_idt:
    lea idt(%rip), %rdi
    lea exc_stubs(%rip), %rsi
    movabs $0x00008e0000080000, %r9     /* present, DPL0, 64-bit interrupt gate, selector 0x08 */
    mov $32, %ecx
1:  mov %rsi, %rax
    call write_gate
    add $16, %rdi
    add $16, %rsi
    dec %ecx
    jnz 1b
    lea idt + IRQ_VECTOR_FIRST * 16(%rip), %rdi
    mov $IRQ_VECTORS, %ecx
2:  lea irq_stub(%rip), %rax
    call write_gate
    add $16, %rdi
    dec %ecx
    jnz 2b
    ret

/* Interrupts (only taken inside the wait service): acknowledge and return to the HLT's end. */
irq_stub:
    push %rax
    mov $LAPIC_EOI, %eax
    movl $0, (%rax)
    pop %rax
    iretq

/* rax = handler, rdi = gate, r9 = selector and attributes */
write_gate:
    mov %rax, %rdx
    and $0xffff, %edx
    or %r9, %rdx
    mov %rax, %r8
    shr $16, %r8
    and $0xffff, %r8d
    shl $48, %r8
    or %r8, %rdx
    mov %rdx, (%rdi)
    shr $32, %rax
    mov %rax, 8(%rdi)
    ret

halt_forever:
    cli
    hlt
    jmp halt_forever

/* One 16-byte stub per exception vector: push a dummy error code where the CPU pushes none. */
    .balign 16
exc_stubs:
    .set vec, 0
    .rept 32
    .balign 16
    .if !((vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30))
    pushq $0
    .endif
    pushq $vec
    jmp exc_common
    .set vec, vec + 1
    .endr

/* Stack: vector, error code, RIP, CS, RFLAGS, RSP, SS. Report on the serial port and end the VM. */
exc_common:
    cmpq $VEC_GP, (%rsp)
    jne 1f
    testb $3, 24(%rsp)          /* from ring 3? */
    jz 1f
    push %rsi
    mov 24(%rsp), %rsi          /* faulting RIP (one slot further down after the push) */
    cmpb $OPCODE_HLT, (%rsi)
    pop %rsi
    jne 1f
    cmp $SERVICE_HALT, %rdi     /* a service request from ring 3 */
    je halt_forever
    cmp $SERVICE_WAIT, %rdi
    jne 2f
    sti
    hlt
    cli
    jmp 3f
2:  cmp $SERVICE_CPUID, %rdi
    jne 1f
    cpuid
3:  incq 16(%rsp)               /* return after the one-byte HLT */
    add $16, %rsp               /* drop vector and error code */
    iretq
1:  lea msg_exc(%rip), %rsi
    call puts0
    mov (%rsp), %rax
    mov $2, %ecx
    call puthex
    lea msg_err(%rip), %rsi
    call puts0
    mov 8(%rsp), %rax
    mov $8, %ecx
    call puthex
    lea msg_rip(%rip), %rsi
    call puts0
    mov 16(%rsp), %rax
    mov $16, %ecx
    call puthex
    lea msg_cr2(%rip), %rsi
    call puts0
    mov %cr2, %rax
    mov $16, %ecx
    call puthex
    lea msg_nl(%rip), %rsi
    call puts0
    mov $STATUS_CRASH, %eax
    mov $DEBUG_EXIT_PORT, %dx
    out %eax, %dx
    jmp halt_forever

/* Writes the zero-terminated string at RSI to the serial port. */
puts0:
    mov $SERIAL_PORT, %dx
1:  lodsb
    test %al, %al
    jz 2f
    out %al, %dx
    jmp 1b
2:  ret

/* Writes the low ECX hex digits of RAX, most significant first. */
puthex:
    mov %rax, %r8
    mov $SERIAL_PORT, %dx
1:  dec %ecx
    mov %r8, %rax
    shl $2, %ecx
    shr %cl, %rax
    shr $2, %ecx
    and $0xf, %eax
    cmp $10, %eax
    jb 2f
    add $39, %eax               /* 'a' - '0' - 10 */
2:  add $48, %eax               /* '0' */
    out %al, %dx
    test %ecx, %ecx
    jnz 1b
    ret

/* ---------------------------------------------------------------------------------------- */
/* Real-mode start-up code for application processors. The BSP copies it to
 * AP_TRAMPOLINE_ADDR (below 1 MiB) and sends INIT/SIPI; it runs with CS = that address >> 4,
 * so it only uses CS-relative data. It enters long mode directly (PE and PG together). */
    .section .rodata.trampoline, "a"
    .code16
    .globl ap_trampoline_start, ap_trampoline_end
ap_trampoline_start:
    cli
    cld
    mov %cs, %ax
    mov %ax, %ds
    lgdtl (ap_gdt_ptr - ap_trampoline_start)
    movl $CR4_BITS, %eax
    mov %eax, %cr4
    movl $pml4, %eax
    mov %eax, %cr3
    movl $MSR_EFER, %ecx
    rdmsr
    orl $EFER_LME, %eax
    wrmsr
    movl $(CR0_PG | CR0_WP | CR0_NE | CR0_MP | CR0_PE), %eax
    mov %eax, %cr0
    ljmpl $SEL_KCODE, $ap_long_entry
    .balign 8
ap_gdt_ptr:
    .word GDT_LIMIT
    .long gdt
ap_trampoline_end:
    .code64

/* ---------------------------------------------------------------------------------------- */
    .section .rodata.boot, "a"
msg_exc: .asciz "\r\n*** microguest: CPU exception "
msg_err: .asciz " error "
msg_rip: .asciz " rip "
msg_cr2: .asciz " cr2 "
msg_nl:  .asciz "\r\n"

/* ---------------------------------------------------------------------------------------- */
    .section .data.boot, "aw"
    .balign 16
gdt:
    .quad 0
    .quad 0x00af9b000000ffff    /* 0x08 kernel code, 64-bit */
    .quad 0x00cf93000000ffff    /* 0x10 kernel data */
    .quad 0x00cffb000000ffff    /* 0x18 user code, 32-bit (unused; keeps the SYSRET layout) */
    .quad 0x00cff3000000ffff    /* 0x20 user data */
    .quad 0x00affb000000ffff    /* 0x28 user code, 64-bit */
    .fill MAX_CPUS * 2, 8, 0    /* 0x30.. TSS descriptors, written by each CPU */
gdt_end:

    .balign 16
    .word 0, 0, 0
gdt_ptr:                        /* 16-bit limit + 64-bit base (32-bit lgdt reads the low half) */
    .word GDT_LIMIT
    .quad gdt

    .balign 16
    .word 0, 0, 0
idt_ptr:
    .word 256 * 16 - 1
    .quad idt

    .balign 4
    .globl next_cpu_index
next_cpu_index:
    .long 1

/* Identity map of the first 16 GiB with 2 MiB user-accessible pages, built at assembly time
 * so no emulated ring-0 loop has to fill it. */
    .section .data.pagetables, "aw"
    .balign 4096
    .globl pml4
pml4:
    .quad pdpt + 0x7
    .fill 511, 8, 0
pdpt:
    .set i, 0
    .rept 16
    .quad pd + i * 4096 + 0x7
    .set i, i + 1
    .endr
    .fill 512 - 16, 8, 0
pd:
    .set i, 0
    .rept 16 * 512
    .quad (i << 21) | 0x87      /* present, writable, user, 2 MiB page */
    .set i, i + 1
    .endr

/* ---------------------------------------------------------------------------------------- */
/* Tables the CPU reads while in ring 3. Initialised data rather than .bss, so they are zero
 * whatever the loader left in memory (the IDT's unused gates must be "not present"). */
    .section .data.tables, "aw"
    .balign 4096
idt:
    .fill 256 * 2, 8, 0
tss_array:
    .fill TSS_STRIDE * MAX_CPUS, 1, 0
iopb:
    .fill IOPB_SIZE, 1, 0       /* all zero: every port allowed */
    .byte 0xff                  /* terminator byte the CPU may read past the bitmap's end */

/* ---------------------------------------------------------------------------------------- */
    .section .bss.stacks, "aw", @nobits
    .balign 4096
kstacks:
    .skip KSTACK_SIZE * MAX_CPUS
bsp_ustack:
    .skip BSP_USTACK_SIZE
ap_ustacks:
    .skip AP_USTACK_SIZE * (MAX_CPUS - 1)
