# Ring 0 of the test guest (AT&T syntax, assembled by rustc through `global_asm!` in main.rs).
#
# Everything here runs in emulated ring 0, so it is kept to a few hundred instructions:
# PVH entry (32-bit, paging off) -> identity page tables -> long mode -> IDT/TSS -> `iretq` into
# ring 3 (IOPL 3, IF 1) at `ring3_main(cpu, start_info)`. After that ring 0 only runs the LAPIC
# timer handler, the idle trap (`ud2` at `guest_idle_trap`: sti; hlt) and the exception printer.
#
# Values in braces are const operands supplied by main.rs (MAX_CPUS, per-CPU page offsets, ...).

    .set KCODE32, 0x08
    .set KDATA, 0x10
    .set KCODE64, 0x18
    .set UDATA, 0x20
    .set UCODE64, 0x28
    .set TSS0, 0x30
    .set PTE_LARGE, 0x87            # present | writable | user | page size
    .set PTE_TABLE, 0x07            # present | writable | user
    .set START_INFO_MAGIC, 0x336ec578
    .set LAPIC_EOI, 0xfee000b0
    .set LAPIC_ID, 0xfee00020
    .set COM1, 0x3f8
    # Vectors that push an error code: 8, 10-14, 17, 21, 29, 30.
    .set ERRCODE_VECTORS, 0x60227d00
# Ring 3 runs with IOPL 3, but the ring-0 emulator on some hosts drops IOPL in iretq, so each
# TSS also carries an I/O permission bitmap that allows ports 0 to 8 * IOMAP_BYTES - 1.

# ---------------------------------------------------------------------------------------------
# PVH entry: 32-bit protected mode, paging off, %ebx = struct hvm_start_info.
    .section .text.boot, "ax"
    .code32
    .globl pvh_start32
pvh_start32:
    cli
    cld
    movl %ebx, boot_start_info
    lgdtl gdt_ptr
    ljmpl $KCODE32, $.Lreload_cs
.Lreload_cs:
    movl $KDATA, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %eax, %fs
    movl %eax, %gs

    # %edi = GiB of address space to map: max(4, end of the highest RAM entry), at most 512.
    movl $4, %edi
    cmpl $START_INFO_MAGIC, (%ebx)
    jne .Lmap_done
    cmpl $1, 4(%ebx)                # version 1 has the memory map
    jb .Lmap_done
    cmpl $0, 44(%ebx)               # memmap above 4 GiB: not reachable with paging off
    jne .Lmap_done
    movl 40(%ebx), %esi             # memmap_paddr
    movl 48(%ebx), %ecx             # memmap_entries
.Lmap_loop:
    testl %ecx, %ecx
    jz .Lmap_done
    cmpl $1, 16(%esi)               # type 1 = RAM
    jne .Lmap_next
    movl (%esi), %eax
    movl 4(%esi), %edx
    addl 8(%esi), %eax
    adcl 12(%esi), %edx             # %edx:%eax = end of the entry
    addl $0x3fffffff, %eax
    adcl $0, %edx                   # round up to a GiB
    cmpl $128, %edx                 # 512 GiB and more: capped below
    jae .Lmap_cap
    shrl $30, %eax
    shll $2, %edx
    orl %edx, %eax                  # %eax = GiB
    cmpl %edi, %eax
    jbe .Lmap_next
    movl %eax, %edi
    jmp .Lmap_next
.Lmap_cap:
    movl $512, %edi
.Lmap_next:
    addl $24, %esi
    decl %ecx
    jmp .Lmap_loop
.Lmap_done:
    cmpl $512, %edi
    jbe .Lmap_store
    movl $512, %edi
.Lmap_store:
    movl %edi, boot_map_gib

    # 1 GiB pages if CPUID 0x80000001 EDX bit 26 says so.
    movl $0x80000000, %eax
    cpuid
    cmpl $0x80000001, %eax
    jb .Lpages_2m
    movl $0x80000001, %eax
    cpuid
    btl $26, %edx
    jnc .Lpages_2m

    # pdpt[i] = i GiB as one large page, for i < %edi.
    movl $1, boot_pages_1g
    xorl %ecx, %ecx
.Lpdpt_1g:
    movl %ecx, %eax
    shll $30, %eax
    orl $PTE_LARGE, %eax
    movl %ecx, %edx
    shrl $2, %edx
    movl %eax, boot_pdpt(,%ecx,8)
    movl %edx, boot_pdpt+4(,%ecx,8)
    incl %ecx
    cmpl %edi, %ecx
    jb .Lpdpt_1g
    movl $boot_tables_free, %ebx
    jmp .Ltables_done

    # 2 MiB pages: the low 4 GiB are the static boot_pd_low; one PD per GiB above that is built
    # in the free memory after the image.
.Lpages_2m:
    movl $boot_tables_free, %ebx
    movl $4, %ecx
.Lpd_gib:
    cmpl %edi, %ecx
    jae .Ltables_done
    movl %ebx, %eax
    orl $PTE_TABLE, %eax
    movl %eax, boot_pdpt(,%ecx,8)
    movl $0, boot_pdpt+4(,%ecx,8)
    movl %ecx, %edx
    shrl $2, %edx                   # high half of every entry in this GiB
    movl %ecx, %ebp
    shll $30, %ebp
    orl $PTE_LARGE, %ebp            # low half of the first entry
    xorl %esi, %esi
.Lpd_entry:
    movl %ebp, (%ebx,%esi,8)
    movl %edx, 4(%ebx,%esi,8)
    addl $0x200000, %ebp
    incl %esi
    cmpl $512, %esi
    jb .Lpd_entry
    addl $4096, %ebx
    incl %ecx
    jmp .Lpd_gib
.Ltables_done:
    movl %ebx, boot_tables_end
    xorl %ebp, %ebp                 # role: bootstrap processor

# Shared by the BSP and the APs (%ebp = 0 BSP, 1 AP): paging + long mode + SSE.
.Lenter_long:
    movl $boot_pml4, %eax
    movl %eax, %cr3
    movl %cr4, %eax
    orl $0x620, %eax                # PAE | OSFXSR | OSXMMEXCPT
    movl %eax, %cr4
    movl $1, %eax
    cpuid
    andl $0x14000000, %ecx          # XSAVE | AVX
    cmpl $0x14000000, %ecx
    jne .Lno_avx
    movl %cr4, %eax
    orl $0x40000, %eax              # OSXSAVE
    movl %eax, %cr4
    xorl %ecx, %ecx
    xorl %edx, %edx
    movl $7, %eax                   # XCR0 = x87 | SSE | AVX
    xsetbv
.Lno_avx:
    movl $0xc0000080, %ecx          # EFER
    rdmsr
    orl $0x100, %eax                # LME
    wrmsr
    movl %cr0, %eax
    andl $0xfffffff3, %eax          # clear EM, TS
    orl $0x80000023, %eax           # PG | NE | MP | PE
    movl %eax, %cr0
    ljmpl $KCODE64, $.Llong_mode

# ---------------------------------------------------------------------------------------------
    .code64
.Llong_mode:
    movl $KDATA, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    xorl %eax, %eax
    movl %eax, %fs
    movl %eax, %gs
    testl %ebp, %ebp
    jnz .Lap_checkin
    leaq percpu+{RSP0_OFF}(%rip), %rsp
    call build_idt
    movb $0xff, %al                 # mask both 8259s: only the LAPIC interrupts us
    outb %al, $0x21
    outb %al, $0xa1
    xorl %ebx, %ebx
    jmp .Lpercpu_init

.Lap_checkin:
    movl $1, %ebx
    lock xaddl %ebx, ap_next(%rip)
    cmpl ${MAX_CPUS}, %ebx
    jae park

# %ebx = CPU index. Own ring-0 stack, TSS (rsp0, I/O bitmap) and TSS descriptor, then iretq to
# ring 3.
.Lpercpu_init:
    movq %rbx, %rdi
    shlq $12, %rdi
    leaq percpu(%rip), %rax
    addq %rax, %rdi
    leaq {RSP0_OFF}(%rdi), %rsp
    leaq {TSS_OFF}(%rdi), %rsi
    movq %rsp, 4(%rsi)              # TSS.rsp0
    movw $104, 102(%rsi)            # I/O permission bitmap right after the TSS
    movb $0xff, 104+{IOMAP_BYTES}(%rsi) # ports 0..8*IOMAP_BYTES allowed (bss: zero), end marker
    movl %ebx, {CPU_OFF}(%rdi)
    movq %rsi, %rax                 # 16-byte available 64-bit TSS descriptor, limit 103
    andl $0xffffff, %eax
    shlq $16, %rax
    orq $(104 + {IOMAP_BYTES}), %rax  # limit: TSS, bitmap and the end byte
    movabsq $0x0000890000000000, %rcx
    orq %rcx, %rax
    movq %rsi, %rcx
    shrq $24, %rcx
    andl $0xff, %ecx
    shlq $56, %rcx
    orq %rcx, %rax
    movq %rsi, %rcx
    shrq $32, %rcx
    movl %ebx, %edx
    shll $4, %edx
    addl $TSS0, %edx
    leaq gdt(%rip), %r8
    movq %rax, (%r8,%rdx)
    movq %rcx, 8(%r8,%rdx)
    ltr %dx
    lidt idt_ptr(%rip)
    leaq user_stacks(%rip), %rax
    leaq 1(%rbx), %rcx
    shlq ${USTACK_SHIFT}, %rcx
    addq %rcx, %rax
    subq $8, %rax                   # as after a call: rsp + 8 is 16-byte aligned
    pushq $(UDATA | 3)
    pushq %rax
    pushq $0x3202                   # IOPL 3 | IF
    pushq $(UCODE64 | 3)
    leaq ring3_main(%rip), %rax
    pushq %rax
    movq %rbx, %rdi
    movq boot_start_info(%rip), %rsi
    iretq

    .globl park
park:
    cli
    hlt
    jmp park

build_idt:
    leaq idt(%rip), %rdi
    leaq exc_stubs(%rip), %rsi
    movl $32, %ecx
.Lidt_loop:
    call set_gate
    addq $16, %rdi
    addq $16, %rsi
    decl %ecx
    jnz .Lidt_loop
    leaq idt+16*{TIMER_VECTOR}(%rip), %rdi
    leaq timer_isr(%rip), %rsi
    call set_gate
    leaq idt+16*{SPURIOUS_VECTOR}(%rip), %rdi
    leaq spurious_isr(%rip), %rsi
    call set_gate
    ret

# %rdi = gate, %rsi = handler (below 4 GiB): 64-bit interrupt gate, DPL 0.
set_gate:
    movl %esi, %eax
    andl $0xffff, %eax
    orl $(KCODE64 << 16), %eax
    movl %eax, (%rdi)
    movl %esi, %eax
    andl $0xffff0000, %eax
    orl $0x8e00, %eax
    movl %eax, 4(%rdi)
    movq $0, 8(%rdi)
    ret

# ---------------------------------------------------------------------------------------------
# Interrupts. They only arrive in ring 3 or in the idle trap's hlt, so %rsp is always inside
# this CPU's page of `percpu` and the tick counter sits at a fixed offset from its base.
timer_isr:
    pushq %rax
    movq %rsp, %rax
    andq $-4096, %rax
    incq {TICKS_OFF}(%rax)
    movabsq $LAPIC_EOI, %rax
    movl $0, (%rax)
    popq %rax
    iretq

spurious_isr:
    iretq

    .balign 16
exc_stubs:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .balign 16
    .if (ERRCODE_VECTORS >> \v) & 1
    pushq $\v
    .else
    pushq $0
    pushq $\v
    .endif
    jmp exc_common
    .endr

# Frame: 0 vector, 8 error code, 16 rip, 24 cs, 32 rflags, 40 rsp, 48 ss.
exc_common:
    cmpq $6, (%rsp)                 # #UD: maybe one of the two ring-3 traps
    jne .Lfatal
    pushq %rax
    leaq guest_idle_trap(%rip), %rax
    cmpq %rax, 24(%rsp)
    jne .Lnot_idle
    addq $2, 24(%rsp)               # resume after the ud2
    popq %rax
    addq $16, %rsp
    sti                             # the shadow of sti covers hlt: no lost wake-up
    hlt
    cli
    iretq
.Lnot_idle:
    leaq guest_halt_trap(%rip), %rax
    cmpq %rax, 24(%rsp)
    popq %rax
    je park
.Lfatal:
    movl $100000, %ecx              # the ring-3 serial lock, but do not wait forever
.Llock:
    movb $1, %al
    xchgb %al, serial_lock(%rip)
    testb %al, %al
    jz .Llocked
    pause
    decl %ecx
    jnz .Llock
.Llocked:
    leaq msg_vector(%rip), %rsi
    call puts
    movq (%rsp), %rax
    call putdec
    leaq msg_rip(%rip), %rsi
    call puts
    movq 16(%rsp), %rax
    call puthex
    leaq msg_err(%rip), %rsi
    call puts
    movq 8(%rsp), %rax
    call puthex
    leaq msg_cpu(%rip), %rsi
    call puts
    movq %rsp, %rax                 # CPU index from the stack page, else the LAPIC ID
    leaq percpu(%rip), %rdx
    subq %rdx, %rax
    cmpq ${MAX_CPUS}*4096, %rax
    jae .Lcpu_from_lapic
    shrq $12, %rax
    jmp .Lcpu_print
.Lcpu_from_lapic:
    movabsq $LAPIC_ID, %rax
    movl (%rax), %eax
    shrl $24, %eax
.Lcpu_print:
    call putdec
    leaq msg_cs(%rip), %rsi
    call puts
    movq 24(%rsp), %rax
    call puthex
    leaq msg_rflags(%rip), %rsi
    call puts
    movq 32(%rsp), %rax
    call puthex
    movb $10, %al
    call putc
    movb $0, serial_lock(%rip)
    jmp park

# %al -> COM1, after waiting (bounded) for the transmitter.
putc:
    pushq %rcx
    pushq %rdx
    movb %al, %ah
    movl $10000, %ecx
    movw $COM1+5, %dx
.Lputc_wait:
    inb %dx, %al
    testb $0x20, %al
    jnz .Lputc_out
    decl %ecx
    jnz .Lputc_wait
.Lputc_out:
    movb %ah, %al
    movw $COM1, %dx
    outb %al, %dx
    popq %rdx
    popq %rcx
    ret

# NUL-terminated string at %rsi.
puts:
    movb (%rsi), %al
    testb %al, %al
    jz .Lputs_done
    call putc
    incq %rsi
    jmp puts
.Lputs_done:
    ret

# %rax as 0x-prefixed hex without leading zeros.
puthex:
    movq %rax, %rdx
    movb $'0', %al
    call putc
    movb $'x', %al
    call putc
    movl $60, %ecx
.Lhex_skip:
    testl %ecx, %ecx
    jz .Lhex_digit
    movq %rdx, %rax
    shrq %cl, %rax
    testb $0xf, %al
    jnz .Lhex_digit
    subl $4, %ecx
    jmp .Lhex_skip
.Lhex_digit:
    movq %rdx, %rax
    shrq %cl, %rax
    andl $0xf, %eax
    leaq hex_digits(%rip), %rsi
    movb (%rsi,%rax), %al
    call putc
    subl $4, %ecx
    jns .Lhex_digit
    ret

# %rax in decimal.
putdec:
    movq %rsp, %rsi
    subq $32, %rsp
    movl $10, %ecx
.Ldec_div:
    xorl %edx, %edx
    divq %rcx
    addb $'0', %dl
    decq %rsi
    movb %dl, (%rsi)
    testq %rax, %rax
    jnz .Ldec_div
.Ldec_out:
    movb (%rsi), %al
    call putc
    incq %rsi
    leaq 32(%rsp), %rax
    cmpq %rax, %rsi
    jb .Ldec_out
    addq $32, %rsp
    ret

# ---------------------------------------------------------------------------------------------
# Ring-3 traps into ring 0 (`int n` is not usable here): the #UD handler recognises these RIPs.
    .globl guest_idle_trap
guest_idle_trap:                    # returns after the next interrupt
    ud2
    ret
    .globl guest_halt_trap
guest_halt_trap:                    # never returns: cli; hlt forever
    ud2
    jmp guest_halt_trap

# ---------------------------------------------------------------------------------------------
# AP trampoline, copied by ring 3 to {TRAMP_ADDR} (SIPI vector {TRAMP_ADDR} >> 12).
    .code16
    .globl ap_tramp_start
ap_tramp_start:
    cli
    cld
    xorw %ax, %ax
    movw %ax, %ds
    lgdtl {TRAMP_ADDR} + (.Ltramp_gdtr - ap_tramp_start)
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $KCODE32, $ap_entry32
    .balign 8
.Ltramp_gdtr:
    .word gdt_end - gdt - 1
    .long gdt
    .globl ap_tramp_end
ap_tramp_end:

    .code32
ap_entry32:
    movl $KDATA, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl $1, %ebp                   # role: application processor
    jmp .Lenter_long
    .code64

# ---------------------------------------------------------------------------------------------
    .section .rodata.boot, "a"
msg_vector:
    .asciz "EXC vector="
msg_rip:
    .asciz " rip="
msg_err:
    .asciz " err="
msg_cpu:
    .asciz " cpu="
msg_cs:
    .asciz " cs="
msg_rflags:
    .asciz " rflags="
hex_digits:
    .ascii "0123456789abcdef"

# PVH entry note: XEN_ELFNOTE_PHYS32_ENTRY (18), owner "Xen". 4-byte aligned as QEMU expects.
    .section .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 8
    .long 18
    .asciz "Xen"
    .balign 4
    .quad pvh_start32
    .balign 4

    .section .data.boot, "aw"
    .balign 16
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff        # 0x08 ring-0 code, 32-bit
    .quad 0x00cf92000000ffff        # 0x10 ring-0 data
    .quad 0x00af9a000000ffff        # 0x18 ring-0 code, 64-bit
    .quad 0x00cff2000000ffff        # 0x20 ring-3 data
    .quad 0x00affa000000ffff        # 0x28 ring-3 code, 64-bit
    .fill {MAX_CPUS} * 2, 8, 0      # 0x30 one 16-byte TSS descriptor per CPU
gdt_end:
    .balign 8
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt
    .balign 8
idt_ptr:
    .word 4095
    .quad idt
    .balign 8
    .globl boot_start_info
boot_start_info:
    .quad 0
    .globl boot_tables_end
boot_tables_end:
    .quad 0
    .globl boot_map_gib
boot_map_gib:
    .quad 0
    .globl boot_pages_1g
boot_pages_1g:
    .quad 0
    .globl ap_next
ap_next:                            # next AP index; ring 3 closes the gate with a large value
    .long 1
    .globl serial_lock
serial_lock:
    .byte 0

# Identity map: PML4[0] -> PDPT; PDPT[0..4] -> boot_pd_low (2 MiB pages for the low 4 GiB),
# overwritten with 1 GiB pages when the CPU has them.
    .balign 4096
boot_pml4:
    .quad boot_pdpt + PTE_TABLE
    .fill 511, 8, 0
boot_pdpt:
    .quad boot_pd_low + PTE_TABLE
    .quad boot_pd_low + 0x1000 + PTE_TABLE
    .quad boot_pd_low + 0x2000 + PTE_TABLE
    .quad boot_pd_low + 0x3000 + PTE_TABLE
    .fill 508, 8, 0
boot_pd_low:
    .set boot_pd_index, 0
    .rept 2048
    .quad (boot_pd_index << 21) | PTE_LARGE
    .set boot_pd_index, boot_pd_index + 1
    .endr

    .section .bss.boot, "aw", @nobits
    .balign 4096
idt:
    .skip 4096
    .globl percpu
percpu:                             # per CPU: ring-0 stack, TSS, tick counter
    .skip {MAX_CPUS} * 4096
    .balign 16
user_stacks:
    .skip {MAX_CPUS} << {USTACK_SHIFT}
